"""The one exception family for failures the user caused, so that the command line has one error path.

A :class:`UserError` (a bad value, file, plugin, checkpoint or output location) is printed by ``metaham`` as one
line, ``metaham COMMAND: error: MESSAGE``, with exit code 2 and no traceback (``metaham --debug ...`` shows it).
Anything else is a bug of ours and keeps its traceback. Library code raises the subclass that fits, whose
message names the culprit (the file, key or value) and the reason; the subclasses also derive from the builtin
a caller would catch (``ValueError``, ``KeyError``, ``ImportError``), so ``except ValueError`` keeps working.

This module imports nothing: ``systems`` and ``tasks`` use it without pulling in the rest of metaham.
"""
from __future__ import annotations


class UserError(Exception):
    """A failure caused by the user's input: the CLI prints its message with exit code 2."""


class UsageError(UserError):
    """Bad input from the user: printed as ``metaham COMMAND: error: ...`` with exit code 2."""


class InvalidValueError(UserError, ValueError):
    """A value the user chose that is not allowed (an unknown name, a number out of range); the message names
    the value and what is allowed."""


class NonFiniteError(UserError, ValueError):
    """A computed result holds NaN or inf (e.g. a plugin's Hamiltonian or an extreme parameter); the message
    names the first bad item. Such results are never written as if they were valid."""


class IntegrationError(UserError, RuntimeError):
    """An integrator cannot follow a trajectory (the state became non-finite, the step size underflowed, an
    implicit step does not converge): the system, its parameters or the integrator settings are the cause."""


class PluginError(UserError, ImportError):
    """A ``--plugin`` file that cannot be loaded: the message names the file (and line) and the reason."""
