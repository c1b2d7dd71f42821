"""Set-up code the provider runs inside every kernel it starts.

This file is sent to the kernel as source text and never imported by the
provider, so it may use only the standard library and IPython: the kernelspec
can be any Python that has ipykernel. It makes ``__glyph_id__`` name the glyph
and ``upstream`` hold the attestation that QNTX sent with each run.
"""


def _kernel_provider_setup(glyph_id):
    ip = get_ipython()  # noqa: F821 - defined inside an IPython kernel
    ip.user_ns["__glyph_id__"] = glyph_id
    ip.user_ns["upstream"] = None

    def set_upstream(info):
        # Only the provider's own requests carry this metadata: a person attached
        # from JupyterLab runs code without touching `upstream`.
        get_parent = getattr(ip.kernel, "get_parent", None)  # ipykernel >= 6
        parent = (get_parent() if get_parent else getattr(ip, "parent_header", None)) or {}
        request = (parent.get("metadata") or {}).get("kernel_provider")
        if isinstance(request, dict):
            ip.user_ns["upstream"] = request.get("upstream")

    ip.events.register("pre_run_cell", set_upstream)
