
Ä


10.0.0.7¨À"­ª
demo-1GET"
/orders/42*api.example.org2httpsRHTTP/2jî


:authorityapi.example.org

:path
/orders/42

:methodGET

:schemehttps


user-agent
curl/8.5.0

accept*/*
4
x-request-id$3f1c2a9e-1b2c-4d5e-8f90-0a1b2c3d4e5f

x-forwarded-protohttps
'
x-envoy-expected-rq-timeout-ms15000
ñ
authorizationßBearer eyJ0eXAiOiJKV1QiLCJhbGciOiJFUzI1NiIsImtpZCI6ImZ1enotZXMyNTYifQ.eyJpc3MiOiJodHRwczovL2lkcC5leGFtcGxlLm9yZyIsImF1ZCI6Im9yZGVycyIsInN1YiI6ImFsaWNlIiwiaWF0IjoxNzQ5OTk5OTQwLCJleHAiOjE3NTAwMDA2MDAsImdyb3VwcyI6WyJvcmRlci1yZWFkZXJzIl0sInNjb3BlIjoib3JkZXJzOnJlYWQifQ.8aUF8RQZ36tgP8LZg10sLzuDQGnTppBVFdu0iN_Kia-HNw6bP_6L5dsf1ZMK8G5PZDXrznDnJkDfO_mcZq26Pg