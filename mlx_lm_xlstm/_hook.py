"""Makes `mlx_lm.models.xlstm` resolve to this package's model module, and
`mlx_lm.chat_templates.xlstm` to its chat template.

Imported at interpreter start by `mlx_lm_xlstm.pth`, so it must stay light:
no mlx, no importlib.abc; the finder is duck-typed and answers for these names only.
"""

import sys

ALIASES = {
    "mlx_lm.models.xlstm": "mlx_lm_xlstm.xlstm",
    "mlx_lm.chat_templates.xlstm": "mlx_lm_xlstm.chat_template",
}


class _AliasLoader:
    def create_module(self, spec):
        provider = ALIASES[spec.name]
        __import__(provider)
        return sys.modules[provider]

    def exec_module(self, module):
        pass


class XLSTMFinder:
    def find_spec(self, fullname, path=None, target=None):
        if fullname not in ALIASES:
            return None
        from importlib.machinery import ModuleSpec

        return ModuleSpec(fullname, _AliasLoader())


def install():
    if not any(isinstance(f, XLSTMFinder) for f in sys.meta_path):
        sys.meta_path.append(XLSTMFinder())


install()
