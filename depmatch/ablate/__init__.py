"""`depmatch ablate`: variants × seeds × depth controls through the ordinary training path, and one report."""
