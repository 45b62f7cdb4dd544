"""``aegis chat``: a full-screen terminal client (Textual), talking to the daemon only through
aegis_client. Nothing here is imported until the command runs: ``aegis --help`` and every other
command load no Textual. Modules: ``model`` (conversations assembled from the API), ``render``
(peer text made inert), ``widgets``, ``screens``, ``app``.
"""
