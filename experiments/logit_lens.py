"""logit lens of both models on the same prompts: KL(instruct ‖ base), entropy, target ranks per layer.

A thin script over `probes.experiments.logit_lens`: the same as `probes run logit_lens`
(`--help` lists its options).
"""
import sys

from probes.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", "logit_lens", *sys.argv[1:]]))
