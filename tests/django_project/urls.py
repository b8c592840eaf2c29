"""URLs of the test project: one view that runs a query on this thread's default connection."""

from __future__ import annotations

from django.db import connection
from django.http import HttpRequest, HttpResponse
from django.urls import path


def query(request: HttpRequest) -> HttpResponse:
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM item")
        (count,) = cursor.fetchone()
    return HttpResponse(str(count))


def one(request: HttpRequest) -> HttpResponse:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        (value,) = cursor.fetchone()
    return HttpResponse(str(value))


urlpatterns = [path("count/", query), path("one/", one)]
