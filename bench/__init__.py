# A package, so that bench/test_*.py never clash with same-named modules in tests/.
