"""em-lab tests (a package, so that tests and benchmarks import the shared fakes as tests.fakes)."""
