"""Makes `mlx_lm.models.xlstm` resolve to this package's model module.

Imported at interpreter start by `mlx_lm_xlstm.pth`, so it must stay light:
no mlx, no importlib.abc; the finder is duck-typed and answers for one name only.
"""

import sys

TARGET = "mlx_lm.models.xlstm"
PROVIDER = "mlx_lm_xlstm.xlstm"


class _AliasLoader:
    def create_module(self, spec):
        __import__(PROVIDER)
        return sys.modules[PROVIDER]

    def exec_module(self, module):
        pass


class XLSTMFinder:
    def find_spec(self, fullname, path=None, target=None):
        if fullname != TARGET:
            return None
        from importlib.machinery import ModuleSpec

        return ModuleSpec(fullname, _AliasLoader())


def install():
    if not any(isinstance(f, XLSTMFinder) for f in sys.meta_path):
        sys.meta_path.append(XLSTMFinder())


install()
