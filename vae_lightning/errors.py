"""Errors a user can cause and fix; entry points print them as one line."""


class UserError(Exception):
    """Something the user can fix: the message says what happened and what to do."""


class DataError(UserError):
    """MNIST is missing, incomplete or corrupt."""


class DivergenceError(UserError):
    """The loss became NaN or infinite."""
