"""Convert a checkpoint's pickle weights (*.bin) to safetensors, in place.

    python -m parathinker.model.to_safetensors DIR

Loads the pickles with `torch.load(weights_only=True)` and writes DIR/model.safetensors (tensors
that shared storage, such as tied embeddings, are copied apart). The *.bin files are kept; once
the safetensors file exists every loader uses it and never reads the pickles.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from safetensors.torch import save_file

from parathinker.model.checkpoint import read_state_dict


def convert(model_dir: str | Path) -> Path:
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"{model_dir} is not a directory")
    if any(model_dir.glob("*.safetensors")):
        raise ValueError(f"{model_dir} already has *.safetensors weights; nothing to convert")
    state = read_state_dict(model_dir, allow_pickle=True)
    out = model_dir / "model.safetensors"
    save_file({k: v.detach().contiguous().clone() for k, v in state.items()}, out,
              metadata={"format": "pt"})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m parathinker.model.to_safetensors", allow_abbrev=False,
                                description=__doc__.splitlines()[0])
    p.add_argument("model_dir", help="checkpoint directory holding pytorch_model*.bin")
    args = p.parse_args(argv)
    try:
        print(f"wrote {convert(args.model_dir)}")
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
