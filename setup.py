"""
securelan: key-server-based network encryption on Twisted.
"""

from setuptools import find_packages, setup

setup(
    name="securelan",
    version="0.1.0",
    description="Key-server-based LAN encryption: pair keys bound to both members' IDs",
    long_description=open("README.rst", encoding="utf-8").read(),
    long_description_content_type="text/x-rst",
    python_requires=">=3.11",
    # find_packages() cannot see twisted/plugins (it must have no __init__.py),
    # so it is listed by hand: twistd finds our plugins there.
    packages=find_packages(include=["securelan", "securelan.*"]) + ["twisted.plugins"],
    package_data={
        "securelan.store": ["schema/*.sql"],
        "twisted.plugins": ["securelan_plugins.py"],
    },
    install_requires=[
        "twisted[tls]>=24.7",
        "pyopenssl>=24.0",
        "service-identity>=24.1",
        "attrs>=23.1",
        "zope.interface>=6.0",
        # 45 bundles OpenSSL 3.5, the first with X25519MLKEM768; 47 has
        # AESGCM.decrypt_into, which the data plane decrypts frames with.
        "cryptography>=47.0",
        # The data plane lays a super-frame's datagrams out in one buffer
        # (and gathers them from one) with strided copies.
        "numpy>=1.26",
        "prometheus-client>=0.20",
    ],
    extras_require={
        # A cascade of key servers on one PostgreSQL store.
        "postgresql": ["psycopg[binary]>=3.2"],
        "test": ["hypothesis>=6.100", "psycopg[binary]>=3.2"],
    },
    entry_points={
        "console_scripts": ["securelan = securelan.cli:main"],
    },
    classifiers=[
        "Framework :: Twisted",
        "Programming Language :: Python :: 3",
        "Topic :: System :: Networking",
        "Topic :: Security :: Cryptography",
    ],
)
