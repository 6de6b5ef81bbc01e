//! The schema stays ready to shard by tenant (Citus): every tenant-owned table has tenant_id
//! first in its primary key, and every foreign key between tenant-owned tables includes it.

use crate::common;

use common::TestApp;

/// (constraint, referencing table, referenced table, referencing columns, referenced columns)
type ForeignKey = (String, String, String, Vec<String>, Vec<String>);

#[tokio::test]
async fn every_tenant_owned_table_leads_its_primary_key_with_tenant_id() {
    let app = TestApp::new().await;
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.columns
         WHERE table_schema = 'public' AND column_name = 'tenant_id' ORDER BY 1",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert!(tables.len() >= 5, "tenant-owned tables: {tables:?}");
    for table in &tables {
        let first: Option<String> = sqlx::query_scalar(
            "SELECT a.attname::text FROM pg_index i
             JOIN pg_class c ON c.oid = i.indrelid
             JOIN pg_namespace n ON n.oid = c.relnamespace
             JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = i.indkey[0]
             WHERE i.indisprimary AND n.nspname = 'public' AND c.relname = $1",
        )
        .bind(table)
        .fetch_optional(&app.pool)
        .await
        .unwrap();
        assert_eq!(
            first.as_deref(),
            Some("tenant_id"),
            "primary key of {table}"
        );
    }
}

#[tokio::test]
async fn every_foreign_key_between_tenant_owned_tables_includes_tenant_id() {
    let app = TestApp::new().await;
    // (constraint, referencing table, referenced table, referencing cols, referenced cols)
    let fks: Vec<ForeignKey> = sqlx::query_as(
        "SELECT con.conname::text, src.relname::text, dst.relname::text,
                (SELECT array_agg(a.attname::text ORDER BY k.i) FROM unnest(con.conkey) WITH ORDINALITY k(n, i)
                   JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.n),
                (SELECT array_agg(a.attname::text ORDER BY k.i) FROM unnest(con.confkey) WITH ORDINALITY k(n, i)
                   JOIN pg_attribute a ON a.attrelid = con.confrelid AND a.attnum = k.n)
         FROM pg_constraint con
         JOIN pg_class src ON src.oid = con.conrelid
         JOIN pg_class dst ON dst.oid = con.confrelid
         JOIN pg_namespace n ON n.oid = src.relnamespace
         WHERE con.contype = 'f' AND n.nspname = 'public'",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert!(!fks.is_empty());
    for (name, src, dst, cols, ref_cols) in fks {
        if dst == "tenants" {
            // The root: a reference table under Citus.
            assert_eq!(cols, ["tenant_id"], "{name}");
            continue;
        }
        let pos = cols.iter().position(|c| c == "tenant_id");
        assert!(
            pos.is_some(),
            "{name} ({src} -> {dst}) does not include tenant_id: {cols:?}"
        );
        assert_eq!(
            ref_cols[pos.unwrap()],
            "tenant_id",
            "{name} maps tenant_id to tenant_id"
        );
    }
}
