"""The benchmarks: the toy benchmark, the scaling study, the memory planner and the local launcher
they start ranks with. Built on the application and the library."""
