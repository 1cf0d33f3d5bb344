"""mean activation difference instruct − base by token role; per-token KL along the response.

A thin script over `probes.experiments.activation_diff`: the same as `probes run activation_diff`
(`--help` lists its options).
"""
import sys

from probes.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", "activation_diff", *sys.argv[1:]]))
