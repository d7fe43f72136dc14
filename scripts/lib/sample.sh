# Sample data and a config pointing at the local services of services.sh.

# ow_load_sample DB COMPANIES PEOPLE_PER_COMPANY FOCUS_SHARE
ow_load_sample() {
    local db=$1 companies=$2 ppc=$3 share=$4
    ow_psql -d postgres -c "CREATE DATABASE $db" >/dev/null
    ow_psql -d "$db" -f "$OW_ROOT/tests/sql/outreach_schema.sql" >/dev/null
    ow_log "generating $companies companies x $ppc people (WV share $share)"
    ow_psql -d "$db" -v companies="$companies" -v people_per_company="$ppc" \
        -v focus_share="$share" -f "$OW_ROOT/tests/sql/generate.sql" >/dev/null
}

# ow_write_config DIR DB BUCKET -> prints the config path. Secrets are not in
# it: they come from the environment, as in production.
ow_write_config() {
    local dir=$1 db=$2 bucket=$3
    mkdir -p "$dir" "$OW_S3_ROOT/$bucket"   # s3s-fs keeps a bucket as a directory
    cat >"$dir/config.toml" <<TOML
[workbench]
dir = "$dir"

[source]
host = "$OW_PG_HOST"
port = $OW_PG_PORT
database = "$db"
user = "$OW_PG_USER"
sslmode = "prefer"

[storage]
endpoint = "$OW_S3_ENDPOINT"
region = "us-east-1"
bucket = "$bucket"
prefix = "outreach"
path_style = true
TOML
    echo "$dir/config.toml"
}

ow_export_secrets() {
    export NEON_PASSWORD=$OW_PG_PASSWORD B2_KEY_ID=$OW_S3_ACCESS_KEY B2_APPLICATION_KEY=$OW_S3_SECRET_KEY
}
