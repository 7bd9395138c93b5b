//! Association negotiation (PS3.8 §9.3.2-§9.3.4): turns an A-ASSOCIATE-RQ into an
//! A-ASSOCIATE-AC or -RJ. Pure; the I/O lives in `server`.

use dicom_ul::pdu::{
    AssociationAC, AssociationRJ, AssociationRJResult, AssociationRJServiceProviderASCEReason,
    AssociationRJServiceUserReason, AssociationRJSource, AssociationRQ, PresentationContextResult,
    PresentationContextResultReason, UserVariableItem,
};

/// The DICOM application context name (PS3.7 Annex A).
pub const APPLICATION_CONTEXT: &str = "1.2.840.10008.3.1.1.1";
/// Verification SOP class.
pub const VERIFICATION: &str = "1.2.840.10008.1.1";
/// Every storage SOP class UID starts with this root.
pub const STORAGE_PREFIX: &str = "1.2.840.10008.5.1.4.1.1.";
/// Implicit VR little endian.
pub const IMPLICIT_VR_LE: &str = "1.2.840.10008.1.2";
/// Explicit VR little endian.
pub const EXPLICIT_VR_LE: &str = "1.2.840.10008.1.2.1";

/// Transfer syntaxes accepted for any accepted abstract syntax.
pub const TRANSFER_SYNTAXES: &[&str] = &[
    IMPLICIT_VR_LE,
    EXPLICIT_VR_LE,
    "1.2.840.10008.1.2.2",    // explicit VR big endian (retired, still sent)
    "1.2.840.10008.1.2.1.99", // deflated explicit VR little endian
    "1.2.840.10008.1.2.4.50", // JPEG baseline
    "1.2.840.10008.1.2.4.51", // JPEG extended
    "1.2.840.10008.1.2.4.57", // JPEG lossless
    "1.2.840.10008.1.2.4.70", // JPEG lossless SV1
    "1.2.840.10008.1.2.4.80", // JPEG-LS lossless
    "1.2.840.10008.1.2.4.81", // JPEG-LS near-lossless
    "1.2.840.10008.1.2.4.90", // JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91", // JPEG 2000
    "1.2.840.10008.1.2.5",    // RLE lossless
];

/// Implementation class UID sent in the A-ASSOCIATE-AC: a UUID-derived `2.25.` UID,
/// since no organisational root is registered for clinflow.
pub const IMPLEMENTATION_CLASS_UID: &str = "2.25.137038125948464847900039011591283709926";
/// Implementation version name sent in the A-ASSOCIATE-AC (at most 16 characters).
pub const IMPLEMENTATION_VERSION: &str = "CLINFLOW_DIMSE";

/// Whether this provider serves the abstract syntax.
pub fn abstract_syntax_supported(uid: &str) -> bool {
    uid == VERIFICATION || uid.starts_with(STORAGE_PREFIX)
}

/// Choose a transfer syntax: the first supported one in the proposer's order, except
/// that explicit VR little endian is taken over implicit when both are proposed.
pub fn choose_transfer_syntax(proposed: &[String]) -> Option<&str> {
    let first = proposed
        .iter()
        .map(|s| s.trim_end_matches(['\0', ' ']))
        .find(|ts| TRANSFER_SYNTAXES.contains(ts))?;
    if first == IMPLICIT_VR_LE
        && proposed
            .iter()
            .any(|s| s.trim_end_matches(['\0', ' ']) == EXPLICIT_VR_LE)
    {
        return Some(EXPLICIT_VR_LE);
    }
    Some(first)
}

/// The result of negotiating one association.
#[derive(Debug)]
pub struct Accepted {
    /// The A-ASSOCIATE-AC to send.
    pub ac: AssociationAC,
    /// The peer's maximum PDU length (variable-field bytes); `None` for unlimited.
    pub peer_max_pdu: Option<u32>,
}

/// Negotiate an association request.
pub fn negotiate(
    rq: &AssociationRQ,
    ae_title: &str,
    strict_called_ae: bool,
    max_pdu_length: u32,
) -> Result<Accepted, AssociationRJ> {
    if rq.protocol_version & 1 == 0 {
        return Err(AssociationRJ {
            result: AssociationRJResult::Permanent,
            source: AssociationRJSource::ServiceProviderASCE(
                AssociationRJServiceProviderASCEReason::ProtocolVersionNotSupported,
            ),
        });
    }
    if rq.application_context_name.trim_end_matches(['\0', ' ']) != APPLICATION_CONTEXT {
        return Err(AssociationRJ {
            result: AssociationRJResult::Permanent,
            source: AssociationRJSource::ServiceUser(
                AssociationRJServiceUserReason::ApplicationContextNameNotSupported,
            ),
        });
    }
    if strict_called_ae && rq.called_ae_title.trim() != ae_title.trim() {
        return Err(AssociationRJ {
            result: AssociationRJResult::Permanent,
            source: AssociationRJSource::ServiceUser(
                AssociationRJServiceUserReason::CalledAETitleNotRecognized,
            ),
        });
    }
    let presentation_contexts = rq
        .presentation_contexts
        .iter()
        .map(|pc| {
            let abstract_syntax = pc.abstract_syntax.trim_end_matches(['\0', ' ']);
            let (reason, ts) = if !abstract_syntax_supported(abstract_syntax) {
                (
                    PresentationContextResultReason::AbstractSyntaxNotSupported,
                    IMPLICIT_VR_LE,
                )
            } else {
                match choose_transfer_syntax(&pc.transfer_syntaxes) {
                    Some(ts) => (PresentationContextResultReason::Acceptance, ts),
                    None => (
                        PresentationContextResultReason::TransferSyntaxesNotSupported,
                        IMPLICIT_VR_LE,
                    ),
                }
            };
            PresentationContextResult {
                id: pc.id,
                reason,
                transfer_syntax: ts.to_owned(),
            }
        })
        .collect();
    let peer_max_pdu = rq
        .user_variables
        .iter()
        .find_map(|v| match v {
            UserVariableItem::MaxLength(n) => Some(*n),
            _ => None,
        })
        .filter(|n| *n != 0);
    Ok(Accepted {
        ac: AssociationAC {
            protocol_version: 1,
            calling_ae_title: rq.calling_ae_title.clone(),
            called_ae_title: rq.called_ae_title.clone(),
            application_context_name: APPLICATION_CONTEXT.to_owned(),
            presentation_contexts,
            user_variables: vec![
                UserVariableItem::MaxLength(max_pdu_length),
                UserVariableItem::ImplementationClassUID(IMPLEMENTATION_CLASS_UID.to_owned()),
                UserVariableItem::ImplementationVersionName(IMPLEMENTATION_VERSION.to_owned()),
            ],
        },
        peer_max_pdu,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use dicom_ul::pdu::PresentationContextProposed;

    fn ts(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn prefers_explicit_over_implicit_otherwise_proposed_order() {
        assert_eq!(
            choose_transfer_syntax(&ts(&[IMPLICIT_VR_LE, EXPLICIT_VR_LE])),
            Some(EXPLICIT_VR_LE)
        );
        assert_eq!(
            choose_transfer_syntax(&ts(&["1.2.3", "1.2.840.10008.1.2.5", EXPLICIT_VR_LE])),
            Some("1.2.840.10008.1.2.5")
        );
        assert_eq!(choose_transfer_syntax(&ts(&["1.2.3"])), None);
    }

    fn rq(called: &str) -> AssociationRQ {
        AssociationRQ {
            protocol_version: 1,
            calling_ae_title: "SCU".into(),
            called_ae_title: called.into(),
            application_context_name: APPLICATION_CONTEXT.into(),
            presentation_contexts: vec![
                PresentationContextProposed {
                    id: 1,
                    abstract_syntax: VERIFICATION.into(),
                    transfer_syntaxes: ts(&[IMPLICIT_VR_LE]),
                },
                PresentationContextProposed {
                    id: 3,
                    abstract_syntax: "1.2.840.10008.5.1.4.1.2.1.1".into(), // a Q/R model
                    transfer_syntaxes: ts(&[IMPLICIT_VR_LE]),
                },
                PresentationContextProposed {
                    id: 5,
                    abstract_syntax: "1.2.840.10008.5.1.4.1.1.2".into(),
                    transfer_syntaxes: ts(&["1.2.3.4"]),
                },
            ],
            user_variables: vec![UserVariableItem::MaxLength(0)],
        }
    }

    #[test]
    fn negotiates_each_context() {
        let acc = negotiate(&rq("ANY"), "CLINFLOW", false, 65536).unwrap();
        let reasons: Vec<_> = acc
            .ac
            .presentation_contexts
            .iter()
            .map(|p| (p.id, p.reason.clone()))
            .collect();
        assert_eq!(
            reasons,
            vec![
                (1, PresentationContextResultReason::Acceptance),
                (
                    3,
                    PresentationContextResultReason::AbstractSyntaxNotSupported
                ),
                (
                    5,
                    PresentationContextResultReason::TransferSyntaxesNotSupported
                ),
            ]
        );
        assert_eq!(acc.peer_max_pdu, None);
    }

    #[test]
    fn strict_called_ae_rejects_other_titles() {
        let rj = negotiate(&rq("OTHER"), "CLINFLOW", true, 65536).unwrap_err();
        assert_eq!(
            rj.source,
            AssociationRJSource::ServiceUser(
                AssociationRJServiceUserReason::CalledAETitleNotRecognized
            )
        );
        assert!(negotiate(&rq("CLINFLOW  "), "CLINFLOW", true, 65536).is_ok());
    }
}
