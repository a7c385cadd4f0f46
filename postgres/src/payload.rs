//! A PostgreSQL branch's payload: a list of SQL statements with parameters and optional
//! row-count guards, and how JSON parameters are bound to the types PostgreSQL infers.
//!
//! In a spec (JSON): `"payload": [{"sql": "UPDATE acct SET balance = balance - $1 WHERE id = $2
//! AND balance >= $1", "params": [30, "alice"], "rows": 1}]`. On the wire it is the MessagePack
//! of the same list. Parameters are always bound, never spliced into the SQL.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio_postgres::types::{to_sql_checked, IsNull, ToSql, Type};

/// One SQL statement of a branch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Statement {
    /// The SQL, with `$1`, `$2`, ... for the parameters.
    pub sql: String,
    /// The parameters, as JSON values (see [`bind`] for the types they bind to).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub params: Vec<Value>,
    /// Row-count guard: the statement must change exactly this many rows, or the branch is
    /// refused (the whole local transaction rolls back).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows: Option<u64>,
}

impl Statement {
    /// A statement with parameters and no guard.
    pub fn new(sql: impl Into<String>, params: Vec<Value>) -> Self {
        Statement { sql: sql.into(), params, rows: None }
    }

    /// The same, guarded: it must change exactly `rows` rows.
    pub fn rows(mut self, rows: u64) -> Self {
        self.rows = Some(rows);
        self
    }
}

/// The payload of `statements`, as a branch carries it.
pub fn encode(statements: &[Statement]) -> Vec<u8> {
    rmp_serde::to_vec_named(statements).expect("statements always serialize")
}

/// Reads a payload; the error says what is wrong with it.
pub fn decode(payload: &[u8]) -> Result<Vec<Statement>, String> {
    if payload.is_empty() {
        return Ok(Vec::new());
    }
    let statements: Vec<Statement> = rmp_serde::from_slice(payload).map_err(|e| {
        format!(
            r#"the payload is not a list of statements ({e}); write [{{"sql": "...", "params": [...], "rows": 1}}]"#
        )
    })?;
    for (i, s) in statements.iter().enumerate() {
        if s.sql.trim().is_empty() {
            return Err(format!("statement {i}: `sql` is empty"));
        }
    }
    Ok(statements)
}

/// Reads a compensation's payload. A step given none (`compensation_payload` omitted or `null`)
/// is refused rather than taken as "nothing to undo": that must be said, with an empty list.
pub fn decode_compensation(payload: &[u8]) -> Result<Vec<Statement>, String> {
    if payload.is_empty() || payload == [0xc0] {
        return Err("this step was given no compensation; give `compensation_payload` (an empty list [] if there is nothing to undo)".into());
    }
    decode(payload)
}

/// A parameter value of the type PostgreSQL expects.
#[derive(Debug)]
pub enum Param {
    /// SQL `NULL`, for any type.
    Null,
    /// `boolean`.
    Bool(bool),
    /// `smallint`.
    I16(i16),
    /// `integer`.
    I32(i32),
    /// `bigint`.
    I64(i64),
    /// `real`.
    F32(f32),
    /// `double precision`.
    F64(f64),
    /// `text`, `varchar`, `char`, `name`.
    Text(String),
    /// `json`, `jsonb`.
    Json(Value),
}

impl ToSql for Param {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut tokio_postgres::types::private::BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self {
            Param::Null => Ok(IsNull::Yes),
            Param::Bool(v) => v.to_sql(ty, out),
            Param::I16(v) => v.to_sql(ty, out),
            Param::I32(v) => v.to_sql(ty, out),
            Param::I64(v) => v.to_sql(ty, out),
            Param::F32(v) => v.to_sql(ty, out),
            Param::F64(v) => v.to_sql(ty, out),
            Param::Text(v) => v.to_sql(ty, out),
            Param::Json(v) => v.to_sql(ty, out),
        }
    }

    fn accepts(_: &Type) -> bool {
        // `bind` chose the variant from the parameter's type.
        true
    }

    to_sql_checked!();
}

/// Binds JSON value `v` to parameter `$n` of type `ty`, or says why it cannot.
///
/// Numbers bind to `smallint`/`integer`/`bigint` (whole, in range) and `real`/`double
/// precision`; strings to text types, and to integer types when they hold a whole number;
/// booleans to `boolean`; anything to `json`/`jsonb`; `null` to any type. Another type (e.g.
/// `numeric`, `timestamp`) is bound by casting a text parameter in the SQL: `$1::text::numeric`.
pub fn bind(v: &Value, ty: &Type, n: usize) -> Result<Param, String> {
    let wrong = |want: &str| format!("parameter ${n} is {ty}: expected {want}, got {v}");
    if v.is_null() {
        return Ok(Param::Null);
    }
    let int = |min: i64, max: i64| -> Result<i64, String> {
        let i = match v {
            Value::Number(x) => x.as_i64(),
            Value::String(s) => s.trim().parse().ok(),
            _ => None,
        };
        i.filter(|i| (min..=max).contains(i)).ok_or_else(|| wrong(&format!("a whole number in {min}..={max}")))
    };
    Ok(match *ty {
        Type::BOOL => Param::Bool(v.as_bool().ok_or_else(|| wrong("true or false"))?),
        Type::INT2 => Param::I16(int(i16::MIN.into(), i16::MAX.into())? as i16),
        Type::INT4 => Param::I32(int(i32::MIN.into(), i32::MAX.into())? as i32),
        Type::INT8 => Param::I64(int(i64::MIN, i64::MAX)?),
        Type::FLOAT4 => Param::F32(v.as_f64().ok_or_else(|| wrong("a number"))? as f32),
        Type::FLOAT8 => Param::F64(v.as_f64().ok_or_else(|| wrong("a number"))?),
        Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::UNKNOWN => match v {
            Value::String(s) => Param::Text(s.clone()),
            Value::Number(x) => Param::Text(x.to_string()),
            Value::Bool(b) => Param::Text(b.to_string()),
            _ => return Err(wrong("a string")),
        },
        Type::JSON | Type::JSONB => Param::Json(v.clone()),
        _ => {
            return Err(format!(
                "parameter ${n} is {ty}, which is not bound from JSON; pass it as text and cast it in the SQL (${n}::text::{ty})"
            ))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn payloads_round_trip_and_bad_ones_say_why() {
        let s = vec![Statement::new("UPDATE t SET x = $1", vec![json!(5)]).rows(1)];
        assert_eq!(decode(&encode(&s)).unwrap(), s);
        let bad = rmp_serde::to_vec_named(&json!([{"sql": "SELECT 1", "param": []}])).unwrap();
        assert!(decode(&bad).unwrap_err().contains("unknown field `param`"));
        let empty = rmp_serde::to_vec_named(&json!([{"sql": " "}])).unwrap();
        assert_eq!(decode(&empty).unwrap_err(), "statement 0: `sql` is empty");
        assert!(decode(b"\x01").unwrap_err().contains("not a list of statements"));
        assert!(decode_compensation(&[0xc0]).unwrap_err().contains("no compensation"));
        assert_eq!(decode_compensation(&encode(&[])).unwrap(), vec![]);
    }

    #[test]
    fn json_binds_to_the_inferred_types() {
        assert!(matches!(bind(&json!(5), &Type::INT8, 1), Ok(Param::I64(5))));
        assert!(matches!(bind(&json!("7"), &Type::INT4, 1), Ok(Param::I32(7))));
        assert!(matches!(bind(&json!(null), &Type::INT4, 1), Ok(Param::Null)));
        assert!(matches!(bind(&json!(3), &Type::TEXT, 1), Ok(Param::Text(s)) if s == "3"));
        assert_eq!(
            bind(&json!(70000), &Type::INT2, 2).unwrap_err(),
            "parameter $2 is int2: expected a whole number in -32768..=32767, got 70000"
        );
        assert!(bind(&json!(1.5), &Type::INT8, 1).is_err());
        assert!(bind(&json!("1"), &Type::NUMERIC, 3).unwrap_err().contains("$3::text::numeric"));
    }
}
