"""``python -m sai_dist.train``: the entry point for torchrun, srun, mpirun and deepspeed."""

from sai_dist.train.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
