//! Role-based access control: which permissions each role holds, whether
//! its management writes need a TOTP code, and whether one principal may
//! hand out a set of grants (a new API key) to another.
//!
//! Deny by default: a permission not listed for a role is refused. The two
//! roles (`admin`, `user`) have built-in permission sets that
//! `[rbac.roles.NAME]` replaces; per-model scopes stay on the principal
//! ([`Principal::may_use_model`]) because they belong to a credential, not
//! a role.
//!
//! [`grants_within`] is the LiteLLM lesson (CVE-2026-47101/47102): a key
//! created over the management API may never carry more than its creator
//! holds: no permission the creator's role lacks, no model outside the
//! creator's scope, no expiry after the creator's.

use crate::keys::{Principal, Role};
use crate::limits::KeyLimits;
use std::collections::BTreeSet;
use std::fmt;

/// One thing a principal may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Permission {
    /// Chat completions and the model list on the inference plane.
    Inference,
    /// `GET /models…` on the management plane.
    ModelsRead,
    /// `POST /models`, `PUT/DELETE /models/{name}`.
    ModelsWrite,
    /// `GET/POST/DELETE /keys…`.
    KeysWrite,
    /// Reading the audit log over an API.
    AuditRead,
    /// `GET /metrics` (unless `metrics.public`).
    MetricsRead,
}

impl Permission {
    pub const ALL: [Permission; 6] = [
        Permission::Inference,
        Permission::ModelsRead,
        Permission::ModelsWrite,
        Permission::KeysWrite,
        Permission::AuditRead,
        Permission::MetricsRead,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Permission::Inference => "inference",
            Permission::ModelsRead => "models:read",
            Permission::ModelsWrite => "models:write",
            Permission::KeysWrite => "keys:write",
            Permission::AuditRead => "audit:read",
            Permission::MetricsRead => "metrics:read",
        }
    }

    pub fn parse(s: &str) -> Option<Permission> {
        Permission::ALL.into_iter().find(|p| p.as_str() == s)
    }
}

impl fmt::Display for Permission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What one role may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleSpec {
    pub permissions: BTreeSet<Permission>,
    /// Management writes by this role need a current TOTP code.
    pub totp_required: bool,
}

impl RoleSpec {
    pub fn new(permissions: impl IntoIterator<Item = Permission>, totp_required: bool) -> Self {
        RoleSpec {
            permissions: permissions.into_iter().collect(),
            totp_required,
        }
    }

    pub fn allows(&self, p: Permission) -> bool {
        self.permissions.contains(&p)
    }
}

/// The roles and what each may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rbac {
    admin: RoleSpec,
    user: RoleSpec,
}

impl Default for Rbac {
    /// `admin`: every permission; `user`: inference and reading the model
    /// list. Neither needs TOTP unless configured.
    fn default() -> Self {
        Rbac {
            admin: RoleSpec::new(Permission::ALL, false),
            user: RoleSpec::new([Permission::Inference, Permission::ModelsRead], false),
        }
    }
}

impl Rbac {
    /// Replace one role's permission set.
    pub fn set(&mut self, role: Role, spec: RoleSpec) {
        match role {
            Role::Admin => self.admin = spec,
            Role::User => self.user = spec,
        }
    }

    pub fn role(&self, role: Role) -> &RoleSpec {
        match role {
            Role::Admin => &self.admin,
            Role::User => &self.user,
        }
    }

    pub fn allows(&self, principal: &Principal, p: Permission) -> bool {
        self.role(principal.role).allows(p)
    }

    pub fn totp_required(&self, principal: &Principal) -> bool {
        self.role(principal.role).totp_required
    }
}

/// What a credential carries: a role, a model scope (`None`: every model)
/// and an expiry (Unix seconds; `None`: never).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grants {
    pub role: Role,
    pub models: Option<Vec<String>>,
    pub expires: Option<u64>,
    /// The limits that would apply: the role's tightened by the key's own.
    pub limits: KeyLimits,
}

impl Grants {
    /// The grants a principal holds now, with the limits that apply to it
    /// (which only the rate limiter's configuration knows).
    pub fn of(principal: &Principal, limits: KeyLimits) -> Self {
        Grants {
            role: principal.role,
            models: principal.models().map(<[String]>::to_vec),
            expires: principal.expires,
            limits,
        }
    }
}

/// Why requested grants exceed the creator's. The message names the
/// escalation so the caller sees exactly what was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Escalation {
    #[error("role {role} grants {permission}, which the creating principal's role ({creator}) does not hold")]
    Permission {
        role: Role,
        creator: Role,
        permission: Permission,
    },
    #[error(
        "role {role} may make management writes without a TOTP code, but the creating principal's role ({creator}) needs one"
    )]
    WeakerStepUp { role: Role, creator: Role },
    #[error("the new key would reach every model; the creating principal may use only {}", .0.join(", "))]
    AllModels(Vec<String>),
    #[error("model {0:?} is outside the creating principal's model scope")]
    Model(String),
    #[error("the new key would never expire; the creating principal's credential expires at {0}")]
    NoExpiry(u64),
    #[error("the new key would expire at {requested}, after the creating principal's credential ({creator})")]
    LaterExpiry { requested: u64, creator: u64 },
    #[error(
        "the new key's limits ({requested}) are looser than the creating principal's ({creator}); every limit the creator has must be set, and no larger"
    )]
    Limits { requested: String, creator: String },
}

impl Escalation {
    /// Stable reason for metrics labels.
    pub fn reason(&self) -> &'static str {
        match self {
            Escalation::Permission { .. } => "grant_permission",
            Escalation::WeakerStepUp { .. } => "grant_totp",
            Escalation::AllModels(_) | Escalation::Model(_) => "grant_model",
            Escalation::NoExpiry(_) | Escalation::LaterExpiry { .. } => "grant_expiry",
            Escalation::Limits { .. } => "grant_limits",
        }
    }
}

/// Refuses `requested` unless it is a subset of `creator`: the requested
/// role's permissions ⊆ the creator's, its step-up at least as strict
/// when it may make management writes,
/// models ⊆ the creator's scope, expiry ≤ the creator's. The one place
/// every grant rule lives (per-key limits are checked here too when keys
/// carry them).
pub fn grants_within(rbac: &Rbac, creator: &Grants, requested: &Grants) -> Result<(), Escalation> {
    let have = rbac.role(creator.role);
    let want = rbac.role(requested.role);
    if let Some(p) = want.permissions.iter().find(|p| !have.allows(**p)) {
        return Err(Escalation::Permission {
            role: requested.role,
            creator: creator.role,
            permission: *p,
        });
    }
    // A key whose role may write without a code, minted by one that needs
    // a code to write, would launder the step-up away.
    let writes = want.allows(Permission::ModelsWrite) || want.allows(Permission::KeysWrite);
    if have.totp_required && !want.totp_required && writes {
        return Err(Escalation::WeakerStepUp {
            role: requested.role,
            creator: creator.role,
        });
    }
    if let Some(scope) = &creator.models {
        match &requested.models {
            None => return Err(Escalation::AllModels(scope.clone())),
            Some(list) => {
                if let Some(m) = list.iter().find(|m| !scope.contains(m)) {
                    return Err(Escalation::Model(m.clone()));
                }
            }
        }
    }
    if let Some(limit) = creator.expires {
        match requested.expires {
            None => return Err(Escalation::NoExpiry(limit)),
            Some(e) if e > limit => {
                return Err(Escalation::LaterExpiry {
                    requested: e,
                    creator: limit,
                });
            }
            Some(_) => {}
        }
    }
    if !requested.limits.is_within(&creator.limits) {
        return Err(Escalation::Limits {
            requested: requested.limits.to_string(),
            creator: creator.limits.to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    fn g(role: Role, models: Option<&[&str]>, expires: Option<u64>) -> Grants {
        Grants {
            role,
            models: models.map(|m| m.iter().map(|s| (*s).to_owned()).collect()),
            expires,
            limits: KeyLimits::default(),
        }
    }

    #[test]
    fn defaults_deny_user_management() {
        let r = Rbac::default();
        assert!(r.role(Role::User).allows(Permission::Inference));
        assert!(r.role(Role::User).allows(Permission::ModelsRead));
        for p in [
            Permission::ModelsWrite,
            Permission::KeysWrite,
            Permission::AuditRead,
            Permission::MetricsRead,
        ] {
            assert!(!r.role(Role::User).allows(p), "{p}");
            assert!(r.role(Role::Admin).allows(p), "{p}");
        }
    }

    #[test]
    fn permissions_parse_round_trip() {
        for p in Permission::ALL {
            assert_eq!(Permission::parse(p.as_str()), Some(p));
        }
        assert_eq!(Permission::parse("models:*"), None);
    }

    #[test]
    fn subset_rules() {
        let mut r = Rbac::default();
        // A user key with keys:write may not mint an admin key.
        r.set(
            Role::User,
            RoleSpec::new([Permission::Inference, Permission::KeysWrite], false),
        );
        let user = g(Role::User, None, None);
        assert_eq!(
            grants_within(&r, &user, &g(Role::Admin, None, None))
                .unwrap_err()
                .reason(),
            "grant_permission"
        );
        assert!(grants_within(&r, &user, &g(Role::User, Some(&["a"]), Some(5))).is_ok());

        let scoped = g(Role::Admin, Some(&["a", "b"]), Some(100));
        assert!(grants_within(&r, &scoped, &g(Role::User, Some(&["a"]), Some(100))).is_ok());
        assert_eq!(
            grants_within(&r, &scoped, &g(Role::User, None, Some(50))),
            Err(Escalation::AllModels(vec!["a".into(), "b".into()]))
        );
        assert_eq!(
            grants_within(&r, &scoped, &g(Role::User, Some(&["c"]), Some(50))),
            Err(Escalation::Model("c".into()))
        );
        assert_eq!(
            grants_within(&r, &scoped, &g(Role::User, Some(&["a"]), None)),
            Err(Escalation::NoExpiry(100))
        );
        assert_eq!(
            grants_within(&r, &scoped, &g(Role::User, Some(&["a"]), Some(101))),
            Err(Escalation::LaterExpiry {
                requested: 101,
                creator: 100
            })
        );
    }

    #[test]
    fn step_up_cannot_be_shed() {
        let mut r = Rbac::default();
        r.set(Role::Admin, RoleSpec::new(Permission::ALL, true));
        r.set(Role::User, RoleSpec::new(Permission::ALL, false));
        let admin = g(Role::Admin, None, None);
        assert_eq!(
            grants_within(&r, &admin, &g(Role::User, None, None))
                .unwrap_err()
                .reason(),
            "grant_totp"
        );
        assert!(grants_within(&r, &admin, &g(Role::Admin, None, None)).is_ok());
        // A role that cannot write sheds nothing by skipping the code.
        r.set(Role::User, RoleSpec::new([Permission::Inference], false));
        assert!(grants_within(&r, &admin, &g(Role::User, None, None)).is_ok());
    }

    #[test]
    fn limits_must_be_at_least_as_tight_as_the_creators() {
        let r = Rbac::default();
        let limited = |rpm: Option<u64>| KeyLimits {
            requests_per_minute: rpm,
            ..KeyLimits::default()
        };
        let mut creator = g(Role::Admin, None, None);
        creator.limits = limited(Some(60));
        let mut want = g(Role::User, None, None);
        // Unlimited under a limited creator is an escalation...
        let e = grants_within(&r, &creator, &want).unwrap_err();
        assert_eq!(e.reason(), "grant_limits");
        assert!(e.to_string().contains("rpm=60"), "{e}");
        // ...and so is a larger limit; an equal or smaller one is not.
        want.limits = limited(Some(61));
        assert!(grants_within(&r, &creator, &want).is_err());
        want.limits = limited(Some(60));
        assert!(grants_within(&r, &creator, &want).is_ok());
        want.limits = limited(Some(1));
        assert!(grants_within(&r, &creator, &want).is_ok());
    }
}
