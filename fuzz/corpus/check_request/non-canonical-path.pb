
Å


10.0.0.7¨À"®«
demo-1GET
:schemehttps

user-agentdemo
:methodGETñ
authorizationßBearer eyJ0eXAiOiJKV1QiLCJhbGciOiJFUzI1NiIsImtpZCI6ImZ1enotZXMyNTYifQ.eyJpc3MiOiJodHRwczovL2lkcC5leGFtcGxlLm9yZyIsImF1ZCI6Im9yZGVycyIsInN1YiI6ImFsaWNlIiwiaWF0IjoxNzQ5OTk5OTQwLCJleHAiOjE3NTAwMDA2MDAsImdyb3VwcyI6WyJvcmRlci1yZWFkZXJzIl0sInNjb3BlIjoib3JkZXJzOnJlYWQifQ.8aUF8RQZ36tgP8LZg10sLzuDQGnTppBVFdu0iN_Kia-HNw6bP_6L5dsf1ZMK8G5PZDXrznDnJkDfO_mcZq26Pg

:authorityapi.example.org
:path/orders/%2e%2e/admin"/orders/%2e%2e/admin*api.example.org2httpsRHTTP/2