from thunder_agent.drivers.kernel import target

# Recorded from tgtadm 1.0.85 (Debian 12) with one initiator logged in.
SHOW = """Target 1: iqn.2010-10.org.openstack.thunder:origin:img1
    System information:
        Driver: iscsi
        State: ready
    I_T nexus information:
        I_T nexus: 1
            Initiator: iqn.1993-08.org.debian:01:cd857b37e7b3 alias: guest
            Connection: 0
                IP Address: 10.99.0.254
    LUN information:
        LUN: 0
            Type: controller
            SCSI ID: IET     00010000
            SCSI SN: beaf10
            Size: 0 MB, Block size: 1
            Online: Yes
            Readonly: No
            Backing store type: null
            Backing store path: None
            Backing store flags:
        LUN: 1
            Type: disk
            SCSI ID: thunder-1a2b3c4d5e6f7a8b
            SCSI SN: 1a2b3c4d5e6f7a8b
            Size: 17 MB, Block size: 512
            Online: Yes
            Readonly: Yes
            Backing store type: rdwr
            Backing store path: /dev/mapper/tha-img1-tpl
            Backing store flags: direct
    Account information:
        thunder-img1
    ACL information:
        ALL
Target 2: iqn.2010-10.org.openstack.thunder:origin:img2
    System information:
        Driver: iscsi
        State: ready
    I_T nexus information:
    LUN information:
        LUN: 0
            Type: controller
            Backing store path: None
    Account information:
    ACL information:
"""


def test_parse_targets():
    targets = target.parse_targets(SHOW)
    assert targets == {
        'iqn.2010-10.org.openstack.thunder:origin:img1': {
            'tid': 1, 'sessions': 1,
            'luns': {0: None, 1: '/dev/mapper/tha-img1-tpl'},
            'accounts': ['thunder-img1'], 'acls': ['ALL']},
        'iqn.2010-10.org.openstack.thunder:origin:img2': {
            'tid': 2, 'sessions': 0, 'luns': {0: None}, 'accounts': [],
            'acls': []},
    }


def test_parse_targets_empty():
    assert target.parse_targets('') == {}
