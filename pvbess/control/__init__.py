"""Controllers that do not learn: rules, the perfect-foresight optimum, the forecasting MPC."""
