"""Every exception class in nodes/core reads `ComfyUI-Astria.<Class>` where ComfyUI names it (not the pack's path)."""
import importlib
import inspect
import pickle
import pkgutil

import comfyui_astria.nodes.core as core
from comfyui_astria.nodes.core import syntax, user_errors


def core_exception_classes():
    for info in pkgutil.iter_modules(core.__path__):
        module = importlib.import_module(f"{core.__name__}.{info.name}")
        for _, value in vars(module).items():
            if inspect.isclass(value) and issubclass(value, BaseException) and value.__module__ in (
                    module.__name__, user_errors.SHOWN_MODULE) and value.__qualname__ in vars(module):
                yield value


def test_every_core_exception_is_shown_as_the_pack():
    classes = sorted({cls.__qualname__: cls for cls in core_exception_classes()}.items())
    assert len(classes) >= 20
    wrong = [name for name, cls in classes if cls.__module__ != user_errors.SHOWN_MODULE]
    assert wrong == []


def test_the_syntax_error_still_pickles_under_its_shown_name():
    error = syntax.AstriaSyntaxError(2, 7, "steps=abc is not a whole number", "give a whole number")
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is syntax.AstriaSyntaxError and str(copy) == str(error)
    assert f"{type(copy).__module__}.{type(copy).__qualname__}" == "ComfyUI-Astria.AstriaSyntaxError"
