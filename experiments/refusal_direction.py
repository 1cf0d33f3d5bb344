"""refusal direction (Arditi et al.): candidates, sweep, selection, ablation / addition rates, base vs instruct.

A thin script over `probes.experiments.refusal_direction`: the same as `probes run refusal_direction`
(`--help` lists its options).
"""
import sys

from probes.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", "refusal_direction", *sys.argv[1:]]))
