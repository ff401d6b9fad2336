//! The checked-in seed corpus of `fuzz/` (`fuzz/seeds/<target>/`), made by the real encoders.
//! The test fails when an encoding changes and the seeds are stale; regenerate them with
//! `VIOLA_WRITE_FUZZ_SEEDS=1 cargo test -p viola-overlay fuzz_seeds`.

use std::net::Ipv4Addr;
use std::path::Path;

use crate::control::{self, ControlMsg, PeerAddr};
use crate::dhcp::{self, MessageType};
use crate::wire::{self, BROADCAST, Nd, ViolinId};

fn check(target: &str, seeds: &[(&str, Vec<u8>)], run: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/seeds")
        .join(target);
    viola_common::fuzz_seeds::check(&dir, seeds, run);
}

fn arp_frame() -> Vec<u8> {
    let arp = wire::tests::arp_request();
    wire::build_arp(BROADCAST, arp.sha, &arp)
}

fn nd_frame() -> Vec<u8> {
    let mac = [2, 0, 0, 0, 0, 1];
    let ll = wire::eui64_link_local(&mac);
    let nd = Nd {
        advert: true,
        src_ip: ll,
        target: ll,
        lladdr: Some(mac),
    };
    wire::build_nd(BROADCAST, mac, &nd)
}

#[test]
fn fuzz_seeds() {
    let v = ViolinId::new(0x0A_BCDE).unwrap();
    let frame = wire::encode_frame(v, &arp_frame(), false);
    let frags = wire::fragment(v, &[0x55; 200], true, 7, 11 + 100).unwrap();
    check(
        "datagram",
        &[
            ("frame", frame.to_vec()),
            (
                "redirected",
                wire::encode_frame(v, &arp_frame(), true).to_vec(),
            ),
            ("fragment0", frags[0].to_vec()),
            ("fragment1", frags[1].to_vec()),
            (
                "relay",
                wire::encode_relay(false, "b/b1", &frame).unwrap().to_vec(),
            ),
            (
                "relayed",
                wire::encode_relay(true, "a/a1", &frags[1])
                    .unwrap()
                    .to_vec(),
            ),
            // Bare Ethernet frames, as guests send them.
            ("arp", arp_frame()),
            ("neighbour_advert", nd_frame()),
        ],
        wire::fuzz_decode,
    );

    let announce = ControlMsg::Announce {
        violin: v,
        mac: "02:00:00:00:00:01".into(),
        seq: 3,
        ip: Some(Ipv4Addr::new(10, 1, 0, 5)),
    };
    check(
        "control",
        &[
            (
                "membership",
                control::encode(&ControlMsg::Membership {
                    violins: vec![v, ViolinId::new(1).unwrap()],
                    ask: true,
                }),
            ),
            (
                "peers",
                control::encode(&ControlMsg::Peers {
                    known: vec![PeerAddr {
                        host: "a/a1".into(),
                        addrs: vec!["198.18.0.1:4433".parse().unwrap()],
                    }],
                }),
            ),
            (
                "relayed_announce",
                control::encode(&ControlMsg::Relayed {
                    from: "c/c1".into(),
                    msg: Box::new(announce),
                }),
            ),
            (
                "expect_move",
                control::encode(&ControlMsg::ExpectMove {
                    violin: v,
                    mac: "02:00:00:00:00:02".into(),
                    host: "b/b1".into(),
                }),
            ),
        ],
        control::fuzz_decode,
    );

    // Scripts for `reassembly::fuzz_reassemble`: limits, then records.
    let mut roundtrip = vec![3, 4, 0x40, 90, 30];
    roundtrip.extend(0..90);
    let mut interleaved = vec![3, 40];
    for (i, p) in frags.iter().enumerate() {
        interleaved.extend([i as u8, p.len() as u8]);
        interleaved.extend_from_slice(p);
        interleaved.push(0x81);
    }
    interleaved.extend([0x00, frags[0].len() as u8]);
    interleaved.extend_from_slice(&frags[0]);
    interleaved.push(0xB2);
    // Scripts for `switch::fuzz_switch`: peers join violin 1, then frames, a fragmented frame,
    // an ARP request on the TAP and a relayed frame.
    let mut switch = Vec::new();
    let mut record = |op: u8, bytes: &[u8]| {
        switch.push(op);
        switch.push(bytes.len() as u8);
        switch.extend_from_slice(bytes);
    };
    let joined = control::encode(&ControlMsg::Membership {
        violins: vec![ViolinId::new(1).unwrap()],
        ask: false,
    });
    for peer in 0..3 {
        record(1 + 4 * peer, &joined[4..]);
    }
    let v1 = ViolinId::new(1).unwrap();
    let unicast = wire::encode_frame(
        v1,
        &crate::switch::test_frame([2, 0, 0, 0, 0, 9], [2, 0, 0, 0, 0, 7], 0x0800, 60, 1),
        false,
    );
    record(4, &unicast);
    for p in wire::fragment(
        v1,
        &crate::switch::test_frame(BROADCAST, [2, 0, 0, 0, 0, 8], 0x0800, 200, 2),
        false,
        1,
        11 + 100,
    )
    .unwrap()
    {
        record(8, &p);
    }
    record(2, &arp_frame());
    record(0, &wire::encode_relay(true, "c/c0", &unicast).unwrap());
    switch.push(0xFF);
    check(
        "switch",
        &[("membership_frames", switch)],
        crate::switch::fuzz_switch,
    );

    check(
        "reassembly",
        &[("roundtrip", roundtrip), ("interleaved", interleaved)],
        crate::reassembly::fuzz_reassemble,
    );

    // DHCP: a client's frames, and a bare message with every option this module knows.
    let server = Ipv4Addr::new(10, 7, 0, 1);
    let client = [0x52, 0x54, 0, 0xaa, 0xbb, 0xcc];
    let discover = dhcp::tests::client_frame(client, MessageType::Discover, None, None);
    let request = dhcp::tests::client_frame(
        client,
        MessageType::Request,
        Some(Ipv4Addr::new(10, 7, 0, 10)),
        Some(server),
    );
    let mut ack = dhcp::parse_client_frame(&request).unwrap().msg;
    ack.op = 2;
    ack.options = dhcp::Options {
        msg_type: Some(MessageType::Ack),
        requested_ip: None,
        server_id: Some(server),
        lease_time: Some(3600),
        renewal_time: Some(1800),
        rebinding_time: Some(3150),
        subnet_mask: Some(Ipv4Addr::new(255, 255, 255, 0)),
        mtu: Some(1500),
    };
    check(
        "dhcp",
        &[
            ("discover_frame", discover),
            ("request_frame", request),
            ("ack_message", ack.encode()),
        ],
        dhcp::fuzz_parse,
    );

    // TAP offloads: a virtio-net header and the frame behind it, as the TAP hands them over.
    let tso = |v6: bool, payload: &[u8], mss: u16| {
        let (hdr, f) =
            crate::offload::segment::tests::tso_frame(v6, 1, 1000, 0x18, 12, payload, mss);
        let mut d = hdr.encode().to_vec();
        d.extend_from_slice(&f);
        d
    };
    let mut plain = crate::offload::VnetHdr::default().encode().to_vec();
    plain.extend_from_slice(&arp_frame());
    check(
        "offload",
        &[
            ("tso4", tso(false, &[0x5a; 4000], 1348)),
            ("tso6", tso(true, &[0xa5; 3000], 1000)),
            ("needs_csum", tso(false, &[1; 100], 1348)),
            ("plain_arp", plain),
        ],
        crate::offload::fuzz_offload,
    );
}
