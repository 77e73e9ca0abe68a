"""Small value checks of core functions that the other tests reach only through whole stages
(written while reading mutmut's survivors, see docs/mutation.md)."""
