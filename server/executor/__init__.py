"""The standalone executor process: serves ExecutorService so a router's ring can span
processes and machines."""
