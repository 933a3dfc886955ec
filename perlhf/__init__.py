"""perlhf: parameter-efficient RLHF as PyTorch Lightning modules."""

from perlhf import quiet

quiet.install()
