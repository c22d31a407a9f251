//! Request decoding as the helper does it: a message becomes a JSON-RPC message, its params
//! the method's params type; ids are checked before they are echoed. Any bytes: an error or
//! a value, never a panic.
#![no_main]

use cstor_protocol::{
    FetchFdsParams, GetImageParams, GetLayerParams, InitializeParams, KeepAliveParams,
    ReleaseLayerParams,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    let _ = cstor_helper::server::id_problem(&value["id"]);
    if let Ok(msg) = jsonrpc_fdpass::JsonRpcMessage::from_json_value(value.clone()) {
        let _ = jsonrpc_fdpass::MessageWithFds::new(msg, Vec::new()).serialize();
    }
    let params = value.get("params").cloned().unwrap_or_default();
    let _ = serde_json::from_value::<InitializeParams>(params.clone());
    let _ = serde_json::from_value::<GetImageParams>(params.clone());
    let _ = serde_json::from_value::<GetLayerParams>(params.clone());
    let _ = serde_json::from_value::<FetchFdsParams>(params.clone());
    let _ = serde_json::from_value::<KeepAliveParams>(params.clone());
    let _ = serde_json::from_value::<ReleaseLayerParams>(params);
});
