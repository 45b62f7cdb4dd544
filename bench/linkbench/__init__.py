"""The linkage benchmark (bench/linkage.py): a relay operator's attack on who talks to whom.

    netns      a network namespace per user whose 127.0.0.1:PORT is a listening socket of ours
    capture    the forwarders (per user, then one tap in front of the relay) and the relay's view
    workload   the seeded contact graph and message schedule
    world      the relay and daemon processes, the run itself, and the ground truth
    adversary  the attack: what it infers from the capture and the relay's data directory
    metrics    precision at k, AUC, correlations, random baselines, the "when" resolution
"""
