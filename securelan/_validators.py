"""
attrs validators that attrs itself no longer ships.
"""


def provides(interface):
    """
    An attrs validator: the value must provide the zope C{interface}, so a
    wrongly wired component fails when it is built, not when first used.
    """

    def check(instance, attribute, value):
        if not interface.providedBy(value):
            raise TypeError(f"{attribute.name} must provide {interface.__name__}, not {value!r}")

    return check
