"""pvbess: train and compare low-CO2 controllers for PV + BESS + EV charging sites."""

__version__ = "0.1.0"
