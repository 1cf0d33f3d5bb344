"""The experiments `probes run` knows, each a module with the same parts:

- `parser(prog)`: its `argparse` parser (the shared flags of `probes.args.add_common_args` and its own);
- `prepare(args)`: every input read and checked, no model loaded (bad input fails here, in a second);
- `run(args, inputs) -> Run`: the run folder opened, the pair loaded, everything computed and saved;
- `main(argv) -> Run`: parse, prepare, run (for notebooks and tests); `report(run)`: its headline in one line.
"""
from __future__ import annotations

import importlib
from types import ModuleType

# name -> one line for `probes --help` (kept here so listing them imports no torch).
EXPERIMENTS: dict[str, str] = {
    "refusal_direction": "refusal direction (Arditi et al.): candidates, sweep, selection, ablation / addition "
                         "rates, base vs instruct",
    "logit_lens": "logit lens of both models on the same prompts: KL(instruct ‖ base), entropy, target ranks "
                  "per layer",
    "activation_diff": "mean activation difference instruct − base by token role; per-token KL along the response",
    "template_attention": "attention of template tokens onto each prompt region; head ranking; head patching",
    "refusal_geometry": "refusal beyond one direction: harmfulness vs refusal, COSMIC selection, per-prompt "
                        "steerability, the refusal-KL frontier, refusal cones",
    "model_diff": "model diffing with dictionaries: BatchTopK / L1 crosscoders, Latent Scaling, a diff-SAE; "
                  "latents by chat-template role, refusal alignment, KL-gap recovery",
}


def load(name: str) -> ModuleType:
    """The module of experiment `name`."""
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; experiments: {', '.join(EXPERIMENTS)}")
    return importlib.import_module(f"probes.experiments.{name}")
