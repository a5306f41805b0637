"""Shared builders for coordinator unit tests."""

import uuid

from thunder_agent.coordinator import manager
from thunder_agent.coordinator import policies

IMAGE = str(uuid.UUID(int=0x7e57))
ORIGIN_INFO = {'driver_volume_type': 'nbd',
               'data': {'host': '198.18.0.1', 'port': 10809,
                        'export': IMAGE}}


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


def address(node):
    return {'host': '%s.example.test' % node, 'port': 10809, 'export': IMAGE}


def make_manager(fan_out=2, clock=None, **kwargs):
    kwargs.setdefault('heartbeat_interval', 1)
    kwargs.setdefault('node_timeout', 5)
    kwargs.setdefault('failure_quarantine', 10)
    return manager.CoordinatorManager(policies.load('kary', fan_out),
                                      clock=clock or Clock(), **kwargs)


def join(mgr, node, image=IMAGE):
    return mgr.join(image, node, address(node), ORIGIN_INFO)


def entry(node, parents, state='ready'):
    return {'address': address(node), 'origin': ORIGIN_INFO,
            'parents': list(parents), 'state': state}


def parent_ids(answer):
    return [p.get('node', 'origin') for p in answer['parents']]


def shape(mgr, image=IMAGE):
    """{node: parents} of a tree, the origin spelled 'origin'."""
    tree = mgr.get_tree(image)
    return {node: ['origin' if p.startswith('@') else p
                   for p in info['parents']]
            for node, info in tree['nodes'].items()}
