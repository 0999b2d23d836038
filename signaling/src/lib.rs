//! # signaling — rooms, participants and access tokens
//!
//! Owns the WebSocket protocol at `/rtc` (see `docs/protocol.md`), participants and room lifecycle,
//! in-meeting votes and chat, and the access tokens that let a client into a room. It drives the
//! media core (`sfu`) through a handle and knows nothing of SQL: the portal decides *who* may have a
//! token, this crate decides what a token *means*.
//!
//! Main types: [`room::Rooms`] (the room service: participants, tracks, admin actions; applies
//! the SFU's events), [`ws::router`] (the `/rtc` endpoint), [`protocol`] (the messages),
//! [`token::TokenKey`] (signs and checks tokens), [`token::Claims`] and
//! [`token::Grants`] (what the holder may do in one room).

pub mod protocol;
pub mod room;
pub mod token;
pub mod ws;
