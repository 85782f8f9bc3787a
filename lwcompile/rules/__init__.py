"""Built-in rules and guards, one per file, written against lwcompile's public API only.

Each file reads as a template for a rule or guard of your own.
"""
