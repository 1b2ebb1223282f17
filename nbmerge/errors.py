"""The errors nbmerge raises for user mistakes: each names the file, tensor or parameter at fault."""


class NBMergeError(Exception):
    """Base of every error nbmerge raises on purpose (bad input, not a bug)."""


class ParameterError(NBMergeError, ValueError):
    """A method parameter is unknown, of the wrong type or out of its declared range."""


class ModelInputError(NBMergeError, ValueError):
    """A model input cannot be read, or the inputs do not agree (keys, shapes, dtypes)."""


class PluginError(NBMergeError):
    """A plugin is broken: duplicate method names, a malformed declaration."""


class OutputExistsError(NBMergeError, FileExistsError):
    """The output folder exists and overwriting was not asked for."""


class MergeCancelled(NBMergeError):
    """The caller's ``cancel`` event was set: the merge stopped between tensors (or steps, or sweep points) and
    wrote nothing."""


class OutputWriteError(NBMergeError, OSError):
    """Writing the output failed (disk full, quota, I/O error); names the file. Nothing is left in its place."""


class NonFiniteError(NBMergeError, ValueError):
    """A tensor holds NaN or ±Inf: an input (named with its model and file) or a merged result (named with the
    method). ``allow_nonfinite=True`` (``--allow-nonfinite``) merges such tensors anyway."""


class RecipeError(NBMergeError, ValueError):
    """A recipe cannot be read, or asks for something nbmerge does not do."""


def shown(value: object, limit: int = 200) -> str:
    """``repr(value)`` bounded for an error message: nested containers are cut after a few items and levels
    (reprlib), so a value built from YAML aliases (9⁹ leaves sharing nine lists) or a deep structure prints in
    microseconds, and the text is cut to ``limit`` characters."""
    import reprlib

    bounded = reprlib.Repr()
    bounded.maxlevel, bounded.maxdict, bounded.maxlist, bounded.maxtuple, bounded.maxset = 3, 4, 6, 6, 6
    bounded.maxstring, bounded.maxother, bounded.maxlong = limit, limit, 40
    text = bounded.repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."
