//! The hash chain of the audit trail.
//!
//! Each record's hash is SHA-256 over the previous record's hash and the
//! record's own fields, so changing, removing or inserting a record breaks
//! the chain from that point on. The first record's previous hash is
//! [`GENESIS`]. Both engines call [`chain`] inside the transaction that
//! appends, holding the engine's append lock, and [`verify`] reads the
//! whole trail in `seq` order.

use sha2::{Digest, Sha256};

use crate::model::{AuditRecord, ChainedAudit};

/// The previous hash of the first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The hash of `record` at `seq` following `prev_hash`.
pub fn hash(seq: i64, prev_hash: &str, record: &AuditRecord) -> String {
    let mut h = Sha256::new();
    // Fields are separated by a byte that cannot occur in them unescaped
    // (0x1F, unit separator), and absent values are distinguished from
    // empty ones, so that no two different records hash alike.
    fn field(h: &mut Sha256, v: Option<&str>) {
        match v {
            Some(s) => {
                h.update(b"+");
                h.update(s.replace('\u{1f}', "\u{1f}\u{1f}").as_bytes());
            }
            None => h.update(b"-"),
        }
        h.update([0x1f]);
    }
    field(&mut h, Some(prev_hash));
    field(&mut h, Some(&seq.to_string()));
    field(&mut h, Some(&record.time.to_string()));
    field(&mut h, Some(&record.actor));
    field(&mut h, Some(&record.role));
    field(&mut h, Some(&record.action));
    field(&mut h, record.resource_type.as_deref());
    field(&mut h, record.resource_id.as_deref());
    field(&mut h, record.version.map(|v| v.to_string()).as_deref());
    field(&mut h, record.reason.as_deref());
    field(&mut h, Some(&record.outcome));
    field(&mut h, record.client.as_deref());
    field(&mut h, record.detail.as_deref());
    hex::encode(h.finalize())
}

/// Chains `records` after the head `(seq, hash)` (`None` for an empty trail).
pub fn chain(head: Option<(i64, String)>, records: Vec<AuditRecord>) -> Vec<ChainedAudit> {
    let (mut seq, mut prev) = head.unwrap_or((0, GENESIS.to_string()));
    records
        .into_iter()
        .map(|record| {
            seq += 1;
            let hash = hash(seq, &prev, &record);
            ChainedAudit {
                seq,
                record,
                prev_hash: std::mem::replace(&mut prev, hash.clone()),
                hash,
            }
        })
        .collect()
}

/// The first break found in the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChainBreak {
    /// The record at `seq` does not hash to its stored hash: it was changed.
    Altered { seq: i64 },
    /// The record at `seq` does not follow the stored hash of the one before
    /// it: a record was inserted, or the one before was changed.
    Inserted { seq: i64 },
    /// Sequence numbers jump from `after` to `next`: records were removed.
    Removed { after: i64, next: i64 },
}

impl std::fmt::Display for ChainBreak {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ChainBreak::Altered { seq } => write!(f, "record {seq} was changed after it was written"),
            ChainBreak::Inserted { seq } => write!(
                f,
                "record {seq} does not follow the record before it: a record was inserted or replaced"
            ),
            ChainBreak::Removed { after, next } => {
                write!(f, "records {}..{} were removed (after {after} comes {next})", after + 1, next - 1)
            }
        }
    }
}

/// Checks a chain read in `seq` order, incrementally: feed every record.
#[derive(Debug)]
pub struct Verifier {
    prev: Option<(i64, String)>,
    /// Records checked so far.
    pub checked: u64,
}

impl Default for Verifier {
    fn default() -> Self {
        Verifier::new()
    }
}

impl Verifier {
    pub fn new() -> Verifier {
        Verifier {
            prev: None,
            checked: 0,
        }
    }

    /// Checks the next record; the first break is returned.
    pub fn feed(&mut self, rec: &ChainedAudit) -> Result<(), ChainBreak> {
        let (prev_seq, prev_hash) = self.prev.clone().unwrap_or((0, GENESIS.to_string()));
        if rec.seq != prev_seq + 1 {
            if rec.seq > prev_seq + 1 {
                return Err(ChainBreak::Removed {
                    after: prev_seq,
                    next: rec.seq,
                });
            }
            return Err(ChainBreak::Inserted { seq: rec.seq });
        }
        if hash(rec.seq, &rec.prev_hash, &rec.record) != rec.hash {
            return Err(ChainBreak::Altered { seq: rec.seq });
        }
        if rec.prev_hash != prev_hash {
            return Err(ChainBreak::Inserted { seq: rec.seq });
        }
        self.prev = Some((rec.seq, rec.hash.clone()));
        self.checked += 1;
        Ok(())
    }

    /// The last good `(seq, hash)`.
    pub fn head(&self) -> Option<&(i64, String)> {
        self.prev.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(i: i64) -> AuditRecord {
        AuditRecord {
            time: 1_700_000_000_000 + i,
            actor: format!("actor-{i}"),
            role: "admin".into(),
            action: "read".into(),
            resource_type: Some("Patient".into()),
            resource_id: Some(format!("p{i}")),
            version: Some(1),
            outcome: "success".into(),
            ..Default::default()
        }
    }

    fn verify_all(chain: &[ChainedAudit]) -> Result<u64, ChainBreak> {
        let mut v = Verifier::new();
        for r in chain {
            v.feed(r)?;
        }
        Ok(v.checked)
    }

    #[test]
    fn an_untouched_chain_verifies_and_continues_across_appends() {
        let first = chain(None, (0..3).map(rec).collect());
        let head = first.last().map(|r| (r.seq, r.hash.clone()));
        let second = chain(head, (3..5).map(rec).collect());
        let all: Vec<_> = first.into_iter().chain(second).collect();
        assert_eq!(verify_all(&all), Ok(5));
    }

    #[test]
    fn a_changed_field_is_found_at_its_record() {
        let mut c = chain(None, (0..5).map(rec).collect());
        c[2].record.outcome = "denied".into();
        assert_eq!(verify_all(&c), Err(ChainBreak::Altered { seq: 3 }));
    }

    #[test]
    fn a_removed_record_is_found() {
        let mut c = chain(None, (0..5).map(rec).collect());
        c.remove(1);
        assert_eq!(
            verify_all(&c),
            Err(ChainBreak::Removed { after: 1, next: 3 })
        );
    }

    #[test]
    fn an_inserted_and_rehashed_record_is_found() {
        let mut c = chain(None, (0..4).map(rec).collect());
        // A forger rewrites record 3 with a valid own hash but cannot fix
        // record 4's link without rewriting everything after it.
        let forged = rec(99);
        c[2].hash = hash(3, &c[2].prev_hash, &forged);
        c[2].record = forged;
        assert_eq!(verify_all(&c), Err(ChainBreak::Inserted { seq: 4 }));
    }

    #[test]
    fn absent_and_empty_fields_hash_differently() {
        let mut a = rec(1);
        let mut b = rec(1);
        a.reason = None;
        b.reason = Some(String::new());
        assert_ne!(hash(1, GENESIS, &a), hash(1, GENESIS, &b));
    }
}
