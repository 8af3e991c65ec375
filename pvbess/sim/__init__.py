"""The simulation: the env and its one step, the reward, the KPIs, the numpy twin of CityLearn."""
