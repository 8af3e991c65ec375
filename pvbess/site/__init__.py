"""The site: its physics (PV, load, EV sessions, battery, tariff), user files and
the CityLearn dataset."""
