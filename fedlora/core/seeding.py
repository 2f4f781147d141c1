"""Every random choice of a run, as a function of the run seed.

Same resolved config, same bytes: which clients a round asks and how each
client shuffles, drops out and initialises must not depend on Flower's node
ids (random in every simulation), on which Ray worker serves a message, or on
what that worker did before. So each choice draws from its own generator,
keyed by NumPy's ``SeedSequence`` on (seed, round, client, purpose), never
from a process-wide stream.

The exception is differential privacy: noise (and the Poisson sample it
relies on) that anyone holding the config can regenerate protects nothing.
``dp_generator`` therefore draws from the operating system unless the run
asks for seeded DP (``dp-seeded-noise``, for simulations only).
"""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # imported by the two functions that make torch generators
    import torch

# SeedSequence keys: one stream per purpose, so adding a use never shifts another
_SAMPLE, _CLIENT, _DP_NOISE, _CENTRAL_NOISE, _FRESH_ADAPTER = 1, 2, 3, 4, 5
_ATTACK, _ATTACK_NOISE = 6, 7  # research attack harness (fedlora.learning.attacks)


def sample_positions(seed: int, server_round: int, population: int, count: int) -> list[int]:
    """``count`` distinct positions in ``range(population)``, a function of
    (seed, round) alone, in increasing order."""
    rng = np.random.default_rng([_SAMPLE, seed, server_round])
    return sorted(int(i) for i in rng.choice(population, size=count, replace=False))


def client_seed(seed: int, server_round: int, client: int) -> int:
    """The seed of one client's local training in one round (shuffling, dropout)."""
    return int(np.random.SeedSequence([_CLIENT, seed, server_round, client])
               .generate_state(1, np.uint32)[0])


def dp_generator(seeded: bool, seed: int, server_round: int, client: int) -> torch.Generator:
    """The generator of one client's DP noise and Poisson sampling in one round:
    secret (from the OS) unless ``seeded``."""
    if not seeded:
        return secret_generator()
    import torch

    state = np.random.SeedSequence([_DP_NOISE, seed, server_round, client])
    return torch.Generator().manual_seed(int(state.generate_state(1, np.uint64)[0]))


def secret_generator() -> torch.Generator:
    """A torch generator seeded from the operating system's entropy."""
    import torch

    return torch.Generator().manual_seed(secrets.randbits(63))


def central_noise_rng(seeded: bool, seed: int, release: int) -> np.random.Generator:
    """The server's generator for the central-DP noise of its ``release``-th
    noisy average (one per round): secret unless ``seeded``."""
    if seeded:
        return np.random.default_rng([_CENTRAL_NOISE, seed, release])
    return np.random.default_rng(secrets.randbits(128))


def fresh_adapter_rng(seed: int, server_round: int) -> np.random.Generator:
    """The draws of a fresh LoRA A after ``server_round`` (FLoRA re-initialises
    every round): a function of (seed, round), like everything else."""
    return np.random.default_rng([_FRESH_ADAPTER, seed, server_round])


def attacker_partitions(seed: int, num_clients: int, fraction: float) -> frozenset[int]:
    """The partitions that attack in a simulation (``fedlora.learning.attacks``): exactly
    ``round(fraction * num_clients)`` distinct ones in ``range(num_clients)``,
    a function of the seed alone, so the same clients attack in every round
    and a run with the same seed attacks with the same ones."""
    count = round(fraction * num_clients)
    if not 0 <= count <= num_clients:
        raise ValueError(f"{count} attackers among {num_clients} clients")
    rng = np.random.default_rng([_ATTACK, seed])
    return frozenset(int(i) for i in rng.choice(num_clients, size=count, replace=False))


def attack_rng(seed: int, server_round: int, client: int) -> np.random.Generator:
    """The draws of one attacking client's noise in one round (attack=noise):
    a function of (seed, round, client), like every other choice of a run."""
    return np.random.default_rng([_ATTACK_NOISE, seed, server_round, client])
