"""``python -m sai_dist.train``: the entry point for torchrun, srun, mpirun and deepspeed."""

from sai_dist.train.cli import main
from sai_dist.train.leave import exit_now

if __name__ == "__main__":
    # A worker ends without interpreter finalization (sai_dist.train.leave); an exception
    # propagates as usual.
    exit_now(main())
