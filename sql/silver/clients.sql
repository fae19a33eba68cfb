{{ config(
    materialized='snapshot',
    unique_key='client_id',
    strategy='timestamp',
    updated_at='updated_at',
    check_cols=['full_name', 'email', 'nino', 'date_of_birth', 'address_line1', 'city', 'postcode', 'accounts'],
    pii=['full_name', 'email', 'nino', 'date_of_birth', 'address_line1', 'city', 'postcode'],
    pseudonymize={'full_name': 'mask', 'email': 'hash', 'nino': 'hash', 'address_line1': 'mask', 'postcode': 'mask'},
    description='Client profiles as SCD2 history: a new version whenever a delivered profile differs from the current one'
) }}

select
    client_id,
    full_name,
    email,
    nino,
    date_of_birth,
    address['line1'] as address_line1,
    address['city'] as city,
    address['postcode'] as postcode,
    array_to_string(accounts, ',') as accounts,
    signup_date,
    _ingested_at as updated_at
from {{ source('clients') }}
