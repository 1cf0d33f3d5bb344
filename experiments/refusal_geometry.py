"""refusal geometry: harmfulness vs refusal, COSMIC selection, per-prompt steerability, the refusal-KL frontier, refusal cones.

A thin script over `probes.experiments.refusal_geometry`: the same as `probes run refusal_geometry`
(`--help` lists its options).
"""
import sys

from probes.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", "refusal_geometry", *sys.argv[1:]]))
