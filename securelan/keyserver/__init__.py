"""
The key server: admits members and hands out pair keys and the group key
(the seed's steps 1 and 3).  L{server} holds the logic and the per-member AMP
sessions; L{tap} builds the twistd service.
"""
