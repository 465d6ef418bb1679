//! Who is calling, and may they. So far: API keys with roles, per-model scopes
//! and expiry ([`keys`]). The server calls [`keys::Keyring::authenticate`] on
//! every non-public route and [`Principal::may_use_model`] before touching a
//! model.

pub mod jwt;
pub mod keys;
pub mod limits;
pub mod ratelimit;
pub mod rbac;
pub mod totp;

pub use keys::{AuthError, Keyring, Principal, PrincipalKind, Role};
pub use limits::KeyLimits;
pub use rbac::{Denied, Escalation, Grants, Permission, Rbac, RoleSpec, grants_within};
