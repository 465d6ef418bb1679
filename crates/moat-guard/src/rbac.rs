//! Role-based access control: which permissions each role holds, whether
//! its management writes need a TOTP code, and whether one principal may
//! hand out a set of grants (a new API key) to another.
//!
//! Deny by default: a permission not listed for a role is refused, and a
//! role the table does not define (a key written with a role since removed
//! from the configuration, say) is refused everything. Two roles are built
//! in, `admin` (every permission) and `user` (inference and reading the
//! model list); `[rbac.roles.NAME]` replaces one of them or defines another
//! (`ops`, `auditor`, …). Per-model scopes stay on the principal
//! ([`Principal::may_use_model`]) because they belong to a credential, not
//! a role.
//!
//! [`grants_within`] is the LiteLLM lesson (CVE-2026-47101/47102): a key
//! created over the management API may never carry more than its creator
//! holds: no permission the creator's role lacks, no model outside the
//! creator's scope, no expiry after the creator's.

use crate::keys::{KeyRecord, Principal, Role};
use crate::limits::KeyLimits;
use std::collections::{BTreeMap, BTreeSet};
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

/// What an undefined role holds: nothing. `totp_required` is set so that
/// no reader of it could take an undefined role for a lax one.
static UNDEFINED: RoleSpec = RoleSpec {
    permissions: BTreeSet::new(),
    totp_required: true,
};

/// The roles and what each may do: the built-ins, as configured, and every
/// role `[rbac.roles.NAME]` defines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rbac {
    roles: BTreeMap<Role, RoleSpec>,
}

impl Default for Rbac {
    /// `admin`: every permission; `user`: inference and reading the model
    /// list. Neither needs TOTP unless configured.
    fn default() -> Self {
        Rbac {
            roles: BTreeMap::from([
                (Role::admin(), RoleSpec::new(Permission::ALL, false)),
                (
                    Role::user(),
                    RoleSpec::new([Permission::Inference, Permission::ModelsRead], false),
                ),
            ]),
        }
    }
}

/// Why a principal's role does not allow a permission; the message names
/// the role (and, when it is defined, the permission it lacks).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    #[error(
        "role {0} is not defined in [rbac] (built in: admin, user), so it is refused everything; \
         define [rbac.roles.{0}] or give the credential a defined role"
    )]
    UndefinedRole(Role),
    #[error("role {role} lacks the {permission} permission this route needs")]
    Missing { role: Role, permission: Permission },
}

impl Rbac {
    /// Define `role`, or replace its permission set.
    pub fn set(&mut self, role: Role, spec: RoleSpec) {
        self.roles.insert(role, spec);
    }

    /// The role's spec, `None` when it is not defined.
    pub fn get(&self, role: &Role) -> Option<&RoleSpec> {
        self.roles.get(role)
    }

    pub fn is_defined(&self, role: &Role) -> bool {
        self.roles.contains_key(role)
    }

    /// The role's spec; an undefined role gets the empty one (no
    /// permission), so that reading it can only ever deny.
    pub fn role(&self, role: &Role) -> &RoleSpec {
        self.roles.get(role).unwrap_or(&UNDEFINED)
    }

    /// Every defined role, by name.
    pub fn roles(&self) -> impl Iterator<Item = (&Role, &RoleSpec)> {
        self.roles.iter()
    }

    /// The defined role names, comma-separated (for error messages).
    pub fn names(&self) -> String {
        self.roles.keys().map(Role::as_str).collect::<Vec<_>>().join(", ")
    }

    pub fn allows(&self, principal: &Principal, p: Permission) -> bool {
        self.check(principal, p).is_ok()
    }

    /// [`Rbac::allows`] with the reason for a refusal.
    pub fn check(&self, principal: &Principal, p: Permission) -> Result<(), Denied> {
        match self.roles.get(&principal.role) {
            None => Err(Denied::UndefinedRole(principal.role.clone())),
            Some(spec) if spec.allows(p) => Ok(()),
            Some(_) => Err(Denied::Missing {
                role: principal.role.clone(),
                permission: p,
            }),
        }
    }

    pub fn totp_required(&self, principal: &Principal) -> bool {
        self.role(&principal.role).totp_required
    }

    /// Keys that still work (neither revoked nor expired at `now`) but whose
    /// role this table does not define: they are refused everything, which
    /// the operator should hear about at start and at each reload.
    pub fn keys_with_undefined_roles<'a>(&self, records: &'a [KeyRecord], now: u64) -> Vec<&'a KeyRecord> {
        records
            .iter()
            .filter(|r| r.revoked.is_none() && r.expires.is_none_or(|e| now < e))
            .filter(|r| !self.is_defined(&r.role))
            .collect()
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
            role: principal.role.clone(),
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
    /// Refused even though an undefined role holds nothing today: defining
    /// it later would hand the key whatever the new definition grants,
    /// which its creator never held.
    #[error("role {0} is not defined in [rbac]: a key can only be given a defined role")]
    UndefinedRole(Role),
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
            Escalation::UndefinedRole(_) => "grant_role",
            Escalation::Permission { .. } => "grant_permission",
            Escalation::WeakerStepUp { .. } => "grant_totp",
            Escalation::AllModels(_) | Escalation::Model(_) => "grant_model",
            Escalation::NoExpiry(_) | Escalation::LaterExpiry { .. } => "grant_expiry",
            Escalation::Limits { .. } => "grant_limits",
        }
    }
}

/// Refuses `requested` unless it is a subset of `creator`: the requested
/// role defined, its permissions ⊆ the creator's, its step-up at least as strict
/// when it may make management writes,
/// models ⊆ the creator's scope, expiry ≤ the creator's. The one place
/// every grant rule lives (per-key limits are checked here too when keys
/// carry them).
pub fn grants_within(rbac: &Rbac, creator: &Grants, requested: &Grants) -> Result<(), Escalation> {
    let want = rbac
        .get(&requested.role)
        .ok_or_else(|| Escalation::UndefinedRole(requested.role.clone()))?;
    // An undefined creator role holds nothing (and never gets this far
    // through the server, which refuses it keys:write first).
    let have = rbac.role(&creator.role);
    if let Some(p) = want.permissions.iter().find(|p| !have.allows(**p)) {
        return Err(Escalation::Permission {
            role: requested.role.clone(),
            creator: creator.role.clone(),
            permission: *p,
        });
    }
    // A key whose role may write without a code, minted by one that needs
    // a code to write, would launder the step-up away.
    let writes = want.allows(Permission::ModelsWrite) || want.allows(Permission::KeysWrite);
    if have.totp_required && !want.totp_required && writes {
        return Err(Escalation::WeakerStepUp {
            role: requested.role.clone(),
            creator: creator.role.clone(),
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
        assert!(r.role(&Role::user()).allows(Permission::Inference));
        assert!(r.role(&Role::user()).allows(Permission::ModelsRead));
        for p in [
            Permission::ModelsWrite,
            Permission::KeysWrite,
            Permission::AuditRead,
            Permission::MetricsRead,
        ] {
            assert!(!r.role(&Role::user()).allows(p), "{p}");
            assert!(r.role(&Role::admin()).allows(p), "{p}");
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
            Role::user(),
            RoleSpec::new([Permission::Inference, Permission::KeysWrite], false),
        );
        let user = g(Role::user(), None, None);
        assert_eq!(
            grants_within(&r, &user, &g(Role::admin(), None, None))
                .unwrap_err()
                .reason(),
            "grant_permission"
        );
        assert!(grants_within(&r, &user, &g(Role::user(), Some(&["a"]), Some(5))).is_ok());

        let scoped = g(Role::admin(), Some(&["a", "b"]), Some(100));
        assert!(grants_within(&r, &scoped, &g(Role::user(), Some(&["a"]), Some(100))).is_ok());
        assert_eq!(
            grants_within(&r, &scoped, &g(Role::user(), None, Some(50))),
            Err(Escalation::AllModels(vec!["a".into(), "b".into()]))
        );
        assert_eq!(
            grants_within(&r, &scoped, &g(Role::user(), Some(&["c"]), Some(50))),
            Err(Escalation::Model("c".into()))
        );
        assert_eq!(
            grants_within(&r, &scoped, &g(Role::user(), Some(&["a"]), None)),
            Err(Escalation::NoExpiry(100))
        );
        assert_eq!(
            grants_within(&r, &scoped, &g(Role::user(), Some(&["a"]), Some(101))),
            Err(Escalation::LaterExpiry {
                requested: 101,
                creator: 100
            })
        );
    }

    #[test]
    fn step_up_cannot_be_shed() {
        let mut r = Rbac::default();
        r.set(Role::admin(), RoleSpec::new(Permission::ALL, true));
        r.set(Role::user(), RoleSpec::new(Permission::ALL, false));
        let admin = g(Role::admin(), None, None);
        assert_eq!(
            grants_within(&r, &admin, &g(Role::user(), None, None))
                .unwrap_err()
                .reason(),
            "grant_totp"
        );
        assert!(grants_within(&r, &admin, &g(Role::admin(), None, None)).is_ok());
        // A role that cannot write sheds nothing by skipping the code.
        r.set(Role::user(), RoleSpec::new([Permission::Inference], false));
        assert!(grants_within(&r, &admin, &g(Role::user(), None, None)).is_ok());
    }

    #[test]
    fn limits_must_be_at_least_as_tight_as_the_creators() {
        let r = Rbac::default();
        let limited = |rpm: Option<u64>| KeyLimits {
            requests_per_minute: rpm,
            ..KeyLimits::default()
        };
        let mut creator = g(Role::admin(), None, None);
        creator.limits = limited(Some(60));
        let mut want = g(Role::user(), None, None);
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

    fn role(name: &str) -> Role {
        Role::new(name).unwrap()
    }

    fn principal(name: &str) -> Principal {
        Principal::new(crate::PrincipalKind::ApiKey, "k1".into(), role(name), None)
    }

    /// `ops`: models:read + models:write (no inference); `auditor`:
    /// audit:read only; `keyops`: keys:write + models:read (no models:write).
    fn custom() -> Rbac {
        let mut r = Rbac::default();
        r.set(
            role("ops"),
            RoleSpec::new([Permission::ModelsRead, Permission::ModelsWrite], true),
        );
        r.set(role("auditor"), RoleSpec::new([Permission::AuditRead], false));
        r.set(
            role("keyops"),
            RoleSpec::new([Permission::KeysWrite, Permission::ModelsRead], false),
        );
        r
    }

    #[test]
    fn custom_roles_hold_exactly_their_permissions() {
        let r = custom();
        let ops = principal("ops");
        assert!(r.allows(&ops, Permission::ModelsRead));
        assert!(r.allows(&ops, Permission::ModelsWrite));
        assert!(r.totp_required(&ops));
        assert_eq!(
            r.check(&ops, Permission::Inference),
            Err(Denied::Missing {
                role: role("ops"),
                permission: Permission::Inference
            })
        );
        let auditor = principal("auditor");
        for p in Permission::ALL {
            assert_eq!(r.allows(&auditor, p), p == Permission::AuditRead, "{p}");
        }
        // Defining roles leaves the built-ins as they were.
        assert!(r.allows(&principal("user"), Permission::Inference));
        assert!(r.allows(&principal("admin"), Permission::KeysWrite));
        assert_eq!(r.names(), "admin, auditor, keyops, ops, user");
    }

    #[test]
    fn an_undefined_role_is_denied_everything_and_named() {
        let r = custom();
        let ghost = principal("ghost");
        for p in Permission::ALL {
            assert!(!r.allows(&ghost, p), "{p}");
        }
        let e = r.check(&ghost, Permission::Inference).unwrap_err();
        assert_eq!(e, Denied::UndefinedRole(role("ghost")));
        assert!(e.to_string().contains("role ghost is not defined"), "{e}");
        assert!(r.totp_required(&ghost), "no lax reading of an undefined role");
        assert!(r.role(&role("ghost")).permissions.is_empty());
        // A built-in taken away is as undefined as any other name: the
        // default table has no `ops`.
        assert!(!Rbac::default().allows(&principal("ops"), Permission::ModelsRead));
    }

    #[test]
    fn grants_with_custom_roles() {
        let r = custom();
        let ops = g(role("ops"), None, None);
        let admin = g(Role::admin(), None, None);
        // ops may not mint admin (admin holds inference, keys:write, ...).
        let e = grants_within(&r, &ops, &admin).unwrap_err();
        assert_eq!(e.reason(), "grant_permission");
        assert!(e.to_string().contains("creating principal's role (ops)"), "{e}");
        // admin may mint ops (and ops's TOTP is stricter, not weaker).
        assert!(grants_within(&r, &admin, &ops).is_ok());
        // keys:write without models:write may not mint a role with it...
        let keyops = g(role("keyops"), None, None);
        assert_eq!(
            grants_within(&r, &keyops, &ops),
            Err(Escalation::Permission {
                role: role("ops"),
                creator: role("keyops"),
                permission: Permission::ModelsWrite
            })
        );
        // ...but may mint a role within its own set, even one with nothing.
        assert!(grants_within(&r, &keyops, &g(role("keyops"), None, None)).is_ok());
        let mut r2 = r.clone();
        r2.set(role("nothing"), RoleSpec::new([], false));
        assert!(grants_within(&r2, &keyops, &g(role("nothing"), None, None)).is_ok());
        // An undefined role is refused even though it holds nothing today.
        assert_eq!(
            grants_within(&r, &admin, &g(role("later"), None, None)),
            Err(Escalation::UndefinedRole(role("later")))
        );
        // ops needs TOTP to write; a code-free writing role would shed it.
        let mut r3 = r.clone();
        r3.set(role("lax"), RoleSpec::new([Permission::ModelsWrite], false));
        assert_eq!(
            grants_within(&r3, &ops, &g(role("lax"), None, None))
                .unwrap_err()
                .reason(),
            "grant_totp"
        );
    }

    #[test]
    fn working_keys_with_undefined_roles_are_listed() {
        let rec = |id: &str, name: &str, revoked: Option<u64>, expires: Option<u64>| KeyRecord {
            id: id.into(),
            role: role(name),
            models: Vec::new(),
            created: 0,
            expires,
            revoked,
            secret_sha256: String::new(),
            limits: None,
        };
        let records = [
            rec("a", "ops", None, None),
            rec("b", "ghost", None, None),
            rec("c", "ghost", Some(5), None),
            rec("d", "ghost", None, Some(10)),
            rec("e", "ghost", None, Some(1000)),
            rec("f", "user", None, None),
        ];
        let ids: Vec<&str> = custom()
            .keys_with_undefined_roles(&records, 100)
            .iter()
            .map(|r| r.id.as_str())
            .collect();
        assert_eq!(ids, ["b", "e"]);
    }
}
