"""attention of template tokens onto each prompt region; head ranking; head patching.

A thin script over `probes.experiments.template_attention`: the same as `probes run template_attention`
(`--help` lists its options).
"""
import sys

from probes.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", "template_attention", *sys.argv[1:]]))
