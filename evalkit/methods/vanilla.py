"""Stable Diffusion as it is: the baseline every other method is compared with."""

from dataclasses import dataclass

from evalkit.sampling.method import METHODS, Method


@METHODS.register
@dataclass
class Vanilla(Method):
    name = "vanilla"
