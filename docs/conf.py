"""Sphinx configuration of lsfov's API reference: ``make docs`` writes it to docs/_build/html.

The reference is the docstrings (numpydoc), each public module's ``__all__``; tests/test_docstrings.py
builds it with warnings as errors.
"""
import lsfov

project = "lsfov"
release = version = lsfov.__version__
extensions = ["sphinx.ext.autodoc", "numpydoc"]
exclude_patterns = ["_build", "notes.md"]
autodoc_default_options = {"members": True}
autodoc_typehints = "none"  # the numpydoc sections say the types, in words
numpydoc_show_class_members = False  # (methods are documented under their class by autodoc)
html_theme = "alabaster"
