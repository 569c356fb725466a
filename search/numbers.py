"""The one test of whether a value is a number to compute with, and the one way a number is shown to people
(reports, plots' ticks, progress lines, sensitivity guidance)."""
import math
import numbers


def is_number(value) -> bool:
    """A finite number (numpy's included), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))


def show_number(value, digits: int = 4) -> str:
    """`value` to `digits` significant digits: whole numbers as integers, very small or large ones as 2.5e-4;
    anything that is not a finite number as str()."""
    if not is_number(value):
        return str(value)
    value = float(value)
    if value.is_integer() and abs(value) < 1e6:
        return str(int(value))
    if abs(value) < 1e-3 or abs(value) >= 1e5:
        mantissa, exponent = f"{value:.{max(digits - 1, 0)}e}".split("e")
        mantissa = mantissa.rstrip("0").rstrip(".") if "." in mantissa else mantissa
        return f"{mantissa}e{int(exponent)}"
    return f"{value:.{digits}g}"
