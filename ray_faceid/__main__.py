"""`python -m ray_faceid <job> ...`: the `ray-faceid` command wherever only the interpreter is
known (a Ray Job's entry point runs with the cluster's PATH, which may not hold the console script)."""
from ray_faceid.cli import main

main()
