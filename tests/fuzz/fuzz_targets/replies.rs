//! Every reply a peer decodes, from the tracker or from another peer (the chunk header): hostile
//! bytes are refused, never a panic; a header that decodes re-encodes to an equal header.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal::protocol::*;

fuzz_target!(|line: &[u8]| {
    if let Ok(h) = decode_reply::<ChunkHeader>(Msg::ChunkRequest, line) {
        let again = encode_reply(Msg::ChunkRequest, &h);
        assert_eq!(decode_reply::<ChunkHeader>(Msg::ChunkRequest, &again).ok(), Some(h));
    }
    let _ = decode_reply::<Registered>(Msg::Register, line);
    let _ = decode_reply::<FileListReply>(Msg::FileList, line);
    if let Ok(loc) = decode_reply::<LocationsReply>(Msg::Locations, line) {
        // What the download engine does with a reply: rebuild each holder's bitfield.
        for h in &loc.peers {
            let _ = shoal::bitfield::Bitfield::from_bytes(h.have.0.clone(), loc.chunks.min(1 << 20) as usize);
        }
    }
    let _ = decode_reply::<ChunksRecorded>(Msg::ChunkRegister, line);
    let _ = decode_reply::<Acknowledged>(Msg::Announce, line);
    let _ = decode_reply::<OriginGrant>(Msg::Origin, line);
});
